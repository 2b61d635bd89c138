"""What the proxy and the registry's fast path both need of HTTP/1.1, owned by neither.

``status``: status lines built once at import. ``batch``: the write batch that sends a loop
turn's writes together. ``limits``: the request-head guard that counts a head's bytes as they
arrive, before the parser buffers them. ``headcache``: whole request heads by their bytes, so
that a repeated head is not parsed again. ``bodies``: a parser for a body alone, for the body
of a request that httptools ended at its head (an upgrade).
"""
