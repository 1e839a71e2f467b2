"""Bringing objects in from outside: files and folders (import), legacy archives (migrate)."""
