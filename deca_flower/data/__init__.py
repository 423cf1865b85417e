"""Data: sources (embedded BBC News, local files, hub ids), non-IID partitions, prompts."""
