from . import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NULL: _ClassVar[DataType]
    INT8: _ClassVar[DataType]
    INT16: _ClassVar[DataType]
    INT32: _ClassVar[DataType]
    INT64: _ClassVar[DataType]
    STRING: _ClassVar[DataType]
    BOOL: _ClassVar[DataType]
    FLOAT: _ClassVar[DataType]
    DOUBLE: _ClassVar[DataType]
    VECTOR: _ClassVar[DataType]
    UNKNOWN: _ClassVar[DataType]

class CompareOperator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LT: _ClassVar[CompareOperator]
    LTE: _ClassVar[CompareOperator]
    EQ: _ClassVar[CompareOperator]
    GT: _ClassVar[CompareOperator]
    GTE: _ClassVar[CompareOperator]
    NE: _ClassVar[CompareOperator]

class Occur(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INVALID: _ClassVar[Occur]
    MUST: _ClassVar[Occur]
    SHOULD: _ClassVar[Occur]
    MUST_NOT: _ClassVar[Occur]
NULL: DataType
INT8: DataType
INT16: DataType
INT32: DataType
INT64: DataType
STRING: DataType
BOOL: DataType
FLOAT: DataType
DOUBLE: DataType
VECTOR: DataType
UNKNOWN: DataType
LT: CompareOperator
LTE: CompareOperator
EQ: CompareOperator
GT: CompareOperator
GTE: CompareOperator
NE: CompareOperator
INVALID: Occur
MUST: Occur
SHOULD: Occur
MUST_NOT: Occur

class KeyValuePair(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class CollectionName(_message.Message):
    __slots__ = ("collection_name",)
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    def __init__(self, collection_name: _Optional[str] = ...) -> None: ...

class CollectionNameList(_message.Message):
    __slots__ = ("status", "collection_names")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_NAMES_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    collection_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., collection_names: _Optional[_Iterable[str]] = ...) -> None: ...

class CollectionSchema(_message.Message):
    __slots__ = ("status", "collection_name", "dimension", "index_file_size", "metric_type", "extra_params")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    METRIC_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    collection_name: str
    dimension: int
    index_file_size: int
    metric_type: int
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., collection_name: _Optional[str] = ..., dimension: _Optional[int] = ..., index_file_size: _Optional[int] = ..., metric_type: _Optional[int] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class PartitionParam(_message.Message):
    __slots__ = ("collection_name", "tag")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    tag: str
    def __init__(self, collection_name: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class PartitionList(_message.Message):
    __slots__ = ("status", "partition_tag_array")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_TAG_ARRAY_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    partition_tag_array: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., partition_tag_array: _Optional[_Iterable[str]] = ...) -> None: ...

class RowRecord(_message.Message):
    __slots__ = ("float_data", "binary_data")
    FLOAT_DATA_FIELD_NUMBER: _ClassVar[int]
    BINARY_DATA_FIELD_NUMBER: _ClassVar[int]
    float_data: _containers.RepeatedScalarFieldContainer[float]
    binary_data: bytes
    def __init__(self, float_data: _Optional[_Iterable[float]] = ..., binary_data: _Optional[bytes] = ...) -> None: ...

class InsertParam(_message.Message):
    __slots__ = ("collection_name", "row_record_array", "row_id_array", "partition_tag", "extra_params")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    ROW_RECORD_ARRAY_FIELD_NUMBER: _ClassVar[int]
    ROW_ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    PARTITION_TAG_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    row_record_array: _containers.RepeatedCompositeFieldContainer[RowRecord]
    row_id_array: _containers.RepeatedScalarFieldContainer[int]
    partition_tag: str
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, collection_name: _Optional[str] = ..., row_record_array: _Optional[_Iterable[_Union[RowRecord, _Mapping]]] = ..., row_id_array: _Optional[_Iterable[int]] = ..., partition_tag: _Optional[str] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class VectorIds(_message.Message):
    __slots__ = ("status", "vector_id_array")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    vector_id_array: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., vector_id_array: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchParam(_message.Message):
    __slots__ = ("collection_name", "partition_tag_array", "query_record_array", "topk", "extra_params")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    PARTITION_TAG_ARRAY_FIELD_NUMBER: _ClassVar[int]
    QUERY_RECORD_ARRAY_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    partition_tag_array: _containers.RepeatedScalarFieldContainer[str]
    query_record_array: _containers.RepeatedCompositeFieldContainer[RowRecord]
    topk: int
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, collection_name: _Optional[str] = ..., partition_tag_array: _Optional[_Iterable[str]] = ..., query_record_array: _Optional[_Iterable[_Union[RowRecord, _Mapping]]] = ..., topk: _Optional[int] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class SearchInFilesParam(_message.Message):
    __slots__ = ("file_id_array", "search_param")
    FILE_ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PARAM_FIELD_NUMBER: _ClassVar[int]
    file_id_array: _containers.RepeatedScalarFieldContainer[str]
    search_param: SearchParam
    def __init__(self, file_id_array: _Optional[_Iterable[str]] = ..., search_param: _Optional[_Union[SearchParam, _Mapping]] = ...) -> None: ...

class SearchByIDParam(_message.Message):
    __slots__ = ("collection_name", "partition_tag_array", "id_array", "topk", "extra_params")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    PARTITION_TAG_ARRAY_FIELD_NUMBER: _ClassVar[int]
    ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    partition_tag_array: _containers.RepeatedScalarFieldContainer[str]
    id_array: _containers.RepeatedScalarFieldContainer[int]
    topk: int
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, collection_name: _Optional[str] = ..., partition_tag_array: _Optional[_Iterable[str]] = ..., id_array: _Optional[_Iterable[int]] = ..., topk: _Optional[int] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class ReLoadSegmentsParam(_message.Message):
    __slots__ = ("collection_name", "segment_id_array")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    segment_id_array: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection_name: _Optional[str] = ..., segment_id_array: _Optional[_Iterable[str]] = ...) -> None: ...

class TopKQueryResult(_message.Message):
    __slots__ = ("status", "row_num", "ids", "distances")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROW_NUM_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    row_num: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    distances: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., row_num: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., distances: _Optional[_Iterable[float]] = ...) -> None: ...

class StringReply(_message.Message):
    __slots__ = ("status", "string_reply")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STRING_REPLY_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    string_reply: str
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., string_reply: _Optional[str] = ...) -> None: ...

class BoolReply(_message.Message):
    __slots__ = ("status", "bool_reply")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BOOL_REPLY_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    bool_reply: bool
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., bool_reply: _Optional[bool] = ...) -> None: ...

class CollectionRowCount(_message.Message):
    __slots__ = ("status", "collection_row_count")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    collection_row_count: int
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., collection_row_count: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("cmd",)
    CMD_FIELD_NUMBER: _ClassVar[int]
    cmd: str
    def __init__(self, cmd: _Optional[str] = ...) -> None: ...

class IndexParam(_message.Message):
    __slots__ = ("status", "collection_name", "index_type", "extra_params")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    collection_name: str
    index_type: int
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., collection_name: _Optional[str] = ..., index_type: _Optional[int] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class FlushParam(_message.Message):
    __slots__ = ("collection_name_array",)
    COLLECTION_NAME_ARRAY_FIELD_NUMBER: _ClassVar[int]
    collection_name_array: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection_name_array: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteByIDParam(_message.Message):
    __slots__ = ("collection_name", "id_array")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    id_array: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, collection_name: _Optional[str] = ..., id_array: _Optional[_Iterable[int]] = ...) -> None: ...

class CollectionInfo(_message.Message):
    __slots__ = ("status", "json_info")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    JSON_INFO_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    json_info: str
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., json_info: _Optional[str] = ...) -> None: ...

class VectorsIdentity(_message.Message):
    __slots__ = ("collection_name", "id_array")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    id_array: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, collection_name: _Optional[str] = ..., id_array: _Optional[_Iterable[int]] = ...) -> None: ...

class VectorsData(_message.Message):
    __slots__ = ("status", "vectors_data")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_DATA_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    vectors_data: _containers.RepeatedCompositeFieldContainer[RowRecord]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., vectors_data: _Optional[_Iterable[_Union[RowRecord, _Mapping]]] = ...) -> None: ...

class GetVectorIDsParam(_message.Message):
    __slots__ = ("collection_name", "segment_name")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    segment_name: str
    def __init__(self, collection_name: _Optional[str] = ..., segment_name: _Optional[str] = ...) -> None: ...

class VectorFieldParam(_message.Message):
    __slots__ = ("dimension",)
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    dimension: int
    def __init__(self, dimension: _Optional[int] = ...) -> None: ...

class FieldType(_message.Message):
    __slots__ = ("data_type", "vector_param")
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_PARAM_FIELD_NUMBER: _ClassVar[int]
    data_type: DataType
    vector_param: VectorFieldParam
    def __init__(self, data_type: _Optional[_Union[DataType, str]] = ..., vector_param: _Optional[_Union[VectorFieldParam, _Mapping]] = ...) -> None: ...

class FieldParam(_message.Message):
    __slots__ = ("id", "name", "type", "extra_params")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    type: FieldType
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., type: _Optional[_Union[FieldType, _Mapping]] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class VectorFieldValue(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: _containers.RepeatedCompositeFieldContainer[RowRecord]
    def __init__(self, value: _Optional[_Iterable[_Union[RowRecord, _Mapping]]] = ...) -> None: ...

class FieldValue(_message.Message):
    __slots__ = ("int32_value", "int64_value", "float_value", "double_value", "string_value", "bool_value", "vector_value")
    INT32_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT64_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    int32_value: int
    int64_value: int
    float_value: float
    double_value: float
    string_value: str
    bool_value: bool
    vector_value: VectorFieldValue
    def __init__(self, int32_value: _Optional[int] = ..., int64_value: _Optional[int] = ..., float_value: _Optional[float] = ..., double_value: _Optional[float] = ..., string_value: _Optional[str] = ..., bool_value: _Optional[bool] = ..., vector_value: _Optional[_Union[VectorFieldValue, _Mapping]] = ...) -> None: ...

class Mapping(_message.Message):
    __slots__ = ("status", "collection_id", "collection_name", "fields")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    collection_id: int
    collection_name: str
    fields: _containers.RepeatedCompositeFieldContainer[FieldParam]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., collection_id: _Optional[int] = ..., collection_name: _Optional[str] = ..., fields: _Optional[_Iterable[_Union[FieldParam, _Mapping]]] = ...) -> None: ...

class MappingList(_message.Message):
    __slots__ = ("status", "mapping_list")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MAPPING_LIST_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    mapping_list: _containers.RepeatedCompositeFieldContainer[Mapping]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., mapping_list: _Optional[_Iterable[_Union[Mapping, _Mapping]]] = ...) -> None: ...

class TermQuery(_message.Message):
    __slots__ = ("field_name", "values", "value_num", "boost", "extra_params")
    FIELD_NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VALUE_NUM_FIELD_NUMBER: _ClassVar[int]
    BOOST_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    field_name: str
    values: bytes
    value_num: int
    boost: float
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, field_name: _Optional[str] = ..., values: _Optional[bytes] = ..., value_num: _Optional[int] = ..., boost: _Optional[float] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class CompareExpr(_message.Message):
    __slots__ = ("operator", "operand")
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    OPERAND_FIELD_NUMBER: _ClassVar[int]
    operator: CompareOperator
    operand: str
    def __init__(self, operator: _Optional[_Union[CompareOperator, str]] = ..., operand: _Optional[str] = ...) -> None: ...

class RangeQuery(_message.Message):
    __slots__ = ("field_name", "operand", "boost", "extra_params")
    FIELD_NAME_FIELD_NUMBER: _ClassVar[int]
    OPERAND_FIELD_NUMBER: _ClassVar[int]
    BOOST_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    field_name: str
    operand: _containers.RepeatedCompositeFieldContainer[CompareExpr]
    boost: float
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, field_name: _Optional[str] = ..., operand: _Optional[_Iterable[_Union[CompareExpr, _Mapping]]] = ..., boost: _Optional[float] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class VectorQuery(_message.Message):
    __slots__ = ("field_name", "query_boost", "records", "topk", "extra_params")
    FIELD_NAME_FIELD_NUMBER: _ClassVar[int]
    QUERY_BOOST_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    field_name: str
    query_boost: float
    records: _containers.RepeatedCompositeFieldContainer[RowRecord]
    topk: int
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, field_name: _Optional[str] = ..., query_boost: _Optional[float] = ..., records: _Optional[_Iterable[_Union[RowRecord, _Mapping]]] = ..., topk: _Optional[int] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class BooleanQuery(_message.Message):
    __slots__ = ("occur", "general_query")
    OCCUR_FIELD_NUMBER: _ClassVar[int]
    GENERAL_QUERY_FIELD_NUMBER: _ClassVar[int]
    occur: Occur
    general_query: _containers.RepeatedCompositeFieldContainer[GeneralQuery]
    def __init__(self, occur: _Optional[_Union[Occur, str]] = ..., general_query: _Optional[_Iterable[_Union[GeneralQuery, _Mapping]]] = ...) -> None: ...

class GeneralQuery(_message.Message):
    __slots__ = ("boolean_query", "term_query", "range_query", "vector_query")
    BOOLEAN_QUERY_FIELD_NUMBER: _ClassVar[int]
    TERM_QUERY_FIELD_NUMBER: _ClassVar[int]
    RANGE_QUERY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_QUERY_FIELD_NUMBER: _ClassVar[int]
    boolean_query: BooleanQuery
    term_query: TermQuery
    range_query: RangeQuery
    vector_query: VectorQuery
    def __init__(self, boolean_query: _Optional[_Union[BooleanQuery, _Mapping]] = ..., term_query: _Optional[_Union[TermQuery, _Mapping]] = ..., range_query: _Optional[_Union[RangeQuery, _Mapping]] = ..., vector_query: _Optional[_Union[VectorQuery, _Mapping]] = ...) -> None: ...

class HSearchParam(_message.Message):
    __slots__ = ("collection_name", "partition_tag_array", "general_query", "extra_params")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    PARTITION_TAG_ARRAY_FIELD_NUMBER: _ClassVar[int]
    GENERAL_QUERY_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    partition_tag_array: _containers.RepeatedScalarFieldContainer[str]
    general_query: GeneralQuery
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, collection_name: _Optional[str] = ..., partition_tag_array: _Optional[_Iterable[str]] = ..., general_query: _Optional[_Union[GeneralQuery, _Mapping]] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class HSearchInSegmentsParam(_message.Message):
    __slots__ = ("segment_id_array", "search_param")
    SEGMENT_ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PARAM_FIELD_NUMBER: _ClassVar[int]
    segment_id_array: _containers.RepeatedScalarFieldContainer[str]
    search_param: HSearchParam
    def __init__(self, segment_id_array: _Optional[_Iterable[str]] = ..., search_param: _Optional[_Union[HSearchParam, _Mapping]] = ...) -> None: ...

class AttrRecord(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, value: _Optional[_Iterable[str]] = ...) -> None: ...

class HEntity(_message.Message):
    __slots__ = ("status", "entity_id", "field_names", "attr_records", "row_num", "result_values")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    FIELD_NAMES_FIELD_NUMBER: _ClassVar[int]
    ATTR_RECORDS_FIELD_NUMBER: _ClassVar[int]
    ROW_NUM_FIELD_NUMBER: _ClassVar[int]
    RESULT_VALUES_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    entity_id: int
    field_names: _containers.RepeatedScalarFieldContainer[str]
    attr_records: bytes
    row_num: int
    result_values: _containers.RepeatedCompositeFieldContainer[FieldValue]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., entity_id: _Optional[int] = ..., field_names: _Optional[_Iterable[str]] = ..., attr_records: _Optional[bytes] = ..., row_num: _Optional[int] = ..., result_values: _Optional[_Iterable[_Union[FieldValue, _Mapping]]] = ...) -> None: ...

class HQueryResult(_message.Message):
    __slots__ = ("status", "entities", "row_num", "score", "distance")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    ROW_NUM_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    entities: _containers.RepeatedCompositeFieldContainer[HEntity]
    row_num: int
    score: _containers.RepeatedScalarFieldContainer[float]
    distance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., entities: _Optional[_Iterable[_Union[HEntity, _Mapping]]] = ..., row_num: _Optional[int] = ..., score: _Optional[_Iterable[float]] = ..., distance: _Optional[_Iterable[float]] = ...) -> None: ...

class HInsertParam(_message.Message):
    __slots__ = ("collection_name", "partition_tag", "entities", "entity_id_array", "extra_params")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    PARTITION_TAG_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    ENTITY_ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    partition_tag: str
    entities: HEntity
    entity_id_array: _containers.RepeatedScalarFieldContainer[int]
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, collection_name: _Optional[str] = ..., partition_tag: _Optional[str] = ..., entities: _Optional[_Union[HEntity, _Mapping]] = ..., entity_id_array: _Optional[_Iterable[int]] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...

class HEntityIdentity(_message.Message):
    __slots__ = ("collection_name", "id")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    id: int
    def __init__(self, collection_name: _Optional[str] = ..., id: _Optional[int] = ...) -> None: ...

class HEntityIDs(_message.Message):
    __slots__ = ("status", "entity_id_array")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ENTITY_ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    entity_id_array: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., entity_id_array: _Optional[_Iterable[int]] = ...) -> None: ...

class HGetEntityIDsParam(_message.Message):
    __slots__ = ("collection_name", "segment_name")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    segment_name: str
    def __init__(self, collection_name: _Optional[str] = ..., segment_name: _Optional[str] = ...) -> None: ...

class HDeleteByIDParam(_message.Message):
    __slots__ = ("collection_name", "id_array")
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    ID_ARRAY_FIELD_NUMBER: _ClassVar[int]
    collection_name: str
    id_array: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, collection_name: _Optional[str] = ..., id_array: _Optional[_Iterable[int]] = ...) -> None: ...

class HIndexParam(_message.Message):
    __slots__ = ("status", "collection_name", "index_type", "extra_params")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PARAMS_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    collection_name: str
    index_type: int
    extra_params: _containers.RepeatedCompositeFieldContainer[KeyValuePair]
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., collection_name: _Optional[str] = ..., index_type: _Optional[int] = ..., extra_params: _Optional[_Iterable[_Union[KeyValuePair, _Mapping]]] = ...) -> None: ...
