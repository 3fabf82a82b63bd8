"""The on-device kit copied into every bundle (see README.md here). Its files stand alone:
they import neither edgepack nor each other."""
