"""The paper's method: Sinkhorn alignment of feature tensors (alignment), the mixing of inputs,
features and labels in every mode (mixup), the losses, and the four-call API for one's own
training loop (api). It imports nothing of training, data or evaluation."""
