"""crowdtrain.coordinator"""
