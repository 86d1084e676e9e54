"""Shared backbones (ResNet, ViT) and checkpoint helpers."""
