"""Looking inside shards: ``check`` (verify against the manifest, by rule), ``info`` (a build from its
manifest), ``stats`` (numbers over a split, no torch) and ``show`` (samples drawn into a PNG).
"""
