"""Merge file I/O: safetensors files, checkpoint folders, chunked reads and the output's files.

Headers and the streaming writer, checkpoint folders, chunked reads, the manifest, the output folder
and the report.
"""
