"""imagesearch plugins."""
