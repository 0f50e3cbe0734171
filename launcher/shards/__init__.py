"""Shards: the format (`format`: index.json, sample members, sha256), reading them (`reader`), writing them
(`writer`: tars and the resume journal; `build`: the `launcher shard` run) and `launcher inspect` (`inspect`)."""
