# image targets: written by the image work
