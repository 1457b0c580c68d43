"""Sidecars: containers beside an app that extend it without changing it."""
