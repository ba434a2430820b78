"""Inference on a saved model folder: load it (`load`), evaluate and forecast (`evaluate`),
predict (`predict`), sample text (`sample`), export to ONNX / TorchScript (`export`)."""
