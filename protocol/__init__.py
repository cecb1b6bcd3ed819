"""crowdtrain.protocol"""
