from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUCCESS: _ClassVar[ErrorCode]
    UNEXPECTED_ERROR: _ClassVar[ErrorCode]
    CONNECT_FAILED: _ClassVar[ErrorCode]
    PERMISSION_DENIED: _ClassVar[ErrorCode]
    COLLECTION_NOT_EXISTS: _ClassVar[ErrorCode]
    ILLEGAL_ARGUMENT: _ClassVar[ErrorCode]
    ILLEGAL_DIMENSION: _ClassVar[ErrorCode]
    ILLEGAL_INDEX_TYPE: _ClassVar[ErrorCode]
    ILLEGAL_COLLECTION_NAME: _ClassVar[ErrorCode]
    ILLEGAL_TOPK: _ClassVar[ErrorCode]
    ILLEGAL_ROWRECORD: _ClassVar[ErrorCode]
    ILLEGAL_VECTOR_ID: _ClassVar[ErrorCode]
    ILLEGAL_SEARCH_RESULT: _ClassVar[ErrorCode]
    FILE_NOT_FOUND: _ClassVar[ErrorCode]
    META_FAILED: _ClassVar[ErrorCode]
    CACHE_FAILED: _ClassVar[ErrorCode]
    CANNOT_CREATE_FOLDER: _ClassVar[ErrorCode]
    CANNOT_CREATE_FILE: _ClassVar[ErrorCode]
    CANNOT_DELETE_FOLDER: _ClassVar[ErrorCode]
    CANNOT_DELETE_FILE: _ClassVar[ErrorCode]
    BUILD_INDEX_ERROR: _ClassVar[ErrorCode]
    ILLEGAL_NLIST: _ClassVar[ErrorCode]
    ILLEGAL_METRIC_TYPE: _ClassVar[ErrorCode]
    OUT_OF_MEMORY: _ClassVar[ErrorCode]
SUCCESS: ErrorCode
UNEXPECTED_ERROR: ErrorCode
CONNECT_FAILED: ErrorCode
PERMISSION_DENIED: ErrorCode
COLLECTION_NOT_EXISTS: ErrorCode
ILLEGAL_ARGUMENT: ErrorCode
ILLEGAL_DIMENSION: ErrorCode
ILLEGAL_INDEX_TYPE: ErrorCode
ILLEGAL_COLLECTION_NAME: ErrorCode
ILLEGAL_TOPK: ErrorCode
ILLEGAL_ROWRECORD: ErrorCode
ILLEGAL_VECTOR_ID: ErrorCode
ILLEGAL_SEARCH_RESULT: ErrorCode
FILE_NOT_FOUND: ErrorCode
META_FAILED: ErrorCode
CACHE_FAILED: ErrorCode
CANNOT_CREATE_FOLDER: ErrorCode
CANNOT_CREATE_FILE: ErrorCode
CANNOT_DELETE_FOLDER: ErrorCode
CANNOT_DELETE_FILE: ErrorCode
BUILD_INDEX_ERROR: ErrorCode
ILLEGAL_NLIST: ErrorCode
ILLEGAL_METRIC_TYPE: ErrorCode
OUT_OF_MEMORY: ErrorCode

class Status(_message.Message):
    __slots__ = ("error_code", "reason")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    error_code: ErrorCode
    reason: str
    def __init__(self, error_code: _Optional[_Union[ErrorCode, str]] = ..., reason: _Optional[str] = ...) -> None: ...
