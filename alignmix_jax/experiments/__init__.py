"""The commands that run experiments made of many trainings or measurements: the
reproductions and the claims table (reproduce), the alignment ablation, the benchmark (bench)
and the figures (visualize)."""
