"""Images in: scanning folders, decoding, demo images, multi-crop views, masks and the data loader."""
