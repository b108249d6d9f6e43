"""Video data: PyAV encode/decode (``video``), webdataset shards (``shards``), CPU loader (``dataset``).

Submodules are imported explicitly (``from nemo_ext.data.shards import ShardIndex``) so that
importing the package stays cheap and does not pull in torch or PyAV until needed.
"""
