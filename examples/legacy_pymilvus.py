"""Lets pymilvus 0.2.12 (the client of Milvus 0.9.1) import on a current protobuf.

`pip install pymilvus==0.2.12` installs a current protobuf, and the 2020 client then fails to
import twice over: its generated `*_pb2` modules only load under protobuf's pure-Python backend,
and it imports a class from protobuf's C++ module, which protobuf 4 removed. Import this module
before `milvus` (copy it beside your code):

    import legacy_pymilvus  # noqa: F401  - before pymilvus
    from milvus import Milvus

It sets PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python (which you may also export in the shell; it
must be set before protobuf is first imported) and provides the missing class. The pure-Python
backend is slower: fine for a client, the reason the proxy itself never imports pymilvus.
"""

from __future__ import annotations

import os
import sys
import types

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

_PYEXT = "google.protobuf.pyext._message"
if _PYEXT not in sys.modules:
    try:
        __import__(_PYEXT)
    except ImportError:
        from google.protobuf import descriptor_pb2

        _stand_in = types.ModuleType(_PYEXT)
        # the container type of a repeated message field, whatever the active backend calls it
        _stand_in.RepeatedCompositeContainer = type(descriptor_pb2.DescriptorProto().field)  # type: ignore[attr-defined]
        sys.modules[_PYEXT] = _stand_in
