"""Harnesses the tests share: fakes, process managers and helpers that are not shipped."""
