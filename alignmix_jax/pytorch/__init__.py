"""The PyTorch side, the only code that imports torch (an optional dependency): the transcription
of the public code (torch_reference), the side-by-side run (parity_run), the benchmark's torch
half (bench_torch) and the torchvision weight converter (convert_torchvision)."""
