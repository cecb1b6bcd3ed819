"""crowdtrain.node"""
