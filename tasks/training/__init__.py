"""What training needs: models, augmentation, the optimiser and schedule, checkpoints, weights, devices."""
