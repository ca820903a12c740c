"""imagesearch server."""
