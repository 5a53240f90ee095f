"""Test helpers: child processes, the real pymilvus client, reference wheels."""
