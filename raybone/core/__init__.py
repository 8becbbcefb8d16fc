"""The method itself, in plain PyTorch: no Ray, no Optuna, no experiment folders.

model       create_model: VGG16 / GoogLeNet for one grey channel, ImageNet or local weights
augment     batched Kornia train-time augmentation and the six test-time crops
inputs      the test crops and sex feature in NumPy (no torch), shared with the ONNX predictor
loss        cross entropy and L2CE
metrics     top-1/2, RMSE, MAE, expected age, confusion matrix
engine      one training step, six-crop prediction
checkpoint  a trial's state as a plain dict of tensors and numbers
saliency    Grad-CAM
"""
