"""Plumbing: errors, atomic writes, downloads, devices and CUDA discovery; no model math."""
