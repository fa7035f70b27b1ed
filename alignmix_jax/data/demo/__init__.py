"""The CIFAR-10 subset embedded in the package (built by `build.py`, read by `data.in_memory`)."""
