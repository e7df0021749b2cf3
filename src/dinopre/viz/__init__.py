"""Pictures: attention maps, augmentation previews, metric plots and the PNG writer they share."""
