"""Volume files: `[header area | data region | quarantine ring]`.

header.py is the header (two copies, crash-safe updates, validation); volume.py creates,
opens and inspects volume files; ring.py formats, reads, verifies and replays the quarantine
ring that takes a dangling volume's writes; seal.py keeps the data region's per-chunk
digests taken at the flip.
"""
