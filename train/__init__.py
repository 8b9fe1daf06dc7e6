"""Fine-tuning code: data, augmentation, losses, metrics, training loop and evaluation."""
