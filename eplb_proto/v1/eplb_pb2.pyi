from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_INT32: DType
DTYPE_INT64: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "report", "plan_ack", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    PLAN_ACK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    report: LoadReport
    plan_ack: PlanAck
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., report: _Optional[_Union[LoadReport, _Mapping]] = ..., plan_ack: _Optional[_Union[PlanAck, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("deployment", "rank", "world_size", "num_layers", "num_experts", "num_slots", "num_nodes", "incarnation", "active_version", "step", "placement")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    rank: int
    world_size: int
    num_layers: int
    num_experts: int
    num_slots: int
    num_nodes: int
    incarnation: str
    active_version: int
    step: int
    placement: Tensor
    def __init__(self, deployment: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., num_slots: _Optional[int] = ..., num_nodes: _Optional[int] = ..., incarnation: _Optional[str] = ..., active_version: _Optional[int] = ..., step: _Optional[int] = ..., placement: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("sequence", "placement_version", "step_begin", "step_end", "counts")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_BEGIN_FIELD_NUMBER: _ClassVar[int]
    STEP_END_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    placement_version: int
    step_begin: int
    step_end: int
    counts: Tensor
    def __init__(self, sequence: _Optional[int] = ..., placement_version: _Optional[int] = ..., step_begin: _Optional[int] = ..., step_end: _Optional[int] = ..., counts: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PlanAck(_message.Message):
    __slots__ = ("version", "rollout_id", "status", "reason", "step", "migration")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[PlanAck.Status]
        STATUS_READY: _ClassVar[PlanAck.Status]
        STATUS_APPLIED: _ClassVar[PlanAck.Status]
        STATUS_FAILED: _ClassVar[PlanAck.Status]
    STATUS_UNSPECIFIED: PlanAck.Status
    STATUS_READY: PlanAck.Status
    STATUS_APPLIED: PlanAck.Status
    STATUS_FAILED: PlanAck.Status
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    version: int
    rollout_id: str
    status: PlanAck.Status
    reason: str
    step: int
    migration: MigrationStats
    def __init__(self, version: _Optional[int] = ..., rollout_id: _Optional[str] = ..., status: _Optional[_Union[PlanAck.Status, str]] = ..., reason: _Optional[str] = ..., step: _Optional[int] = ..., migration: _Optional[_Union[MigrationStats, _Mapping]] = ...) -> None: ...

class MigrationStats(_message.Message):
    __slots__ = ("bytes_moved", "transfers", "local_copies", "total_pause_ms", "max_layer_ms")
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_COPIES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_LAYER_MS_FIELD_NUMBER: _ClassVar[int]
    bytes_moved: int
    transfers: int
    local_copies: int
    total_pause_ms: float
    max_layer_ms: float
    def __init__(self, bytes_moved: _Optional[int] = ..., transfers: _Optional[int] = ..., local_copies: _Optional[int] = ..., total_pause_ms: _Optional[float] = ..., max_layer_ms: _Optional[float] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("step", "active_version")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    step: int
    active_version: int
    def __init__(self, step: _Optional[int] = ..., active_version: _Optional[int] = ...) -> None: ...

class ServiceMessage(_message.Message):
    __slots__ = ("ack", "plan", "cancel", "settings")
    ACK_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    plan: Plan
    cancel: Cancel
    settings: Settings
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., settings: _Optional[_Union[Settings, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("version", "rollout_id", "phy2log")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    version: int
    rollout_id: str
    phy2log: Tensor
    def __init__(self, version: _Optional[int] = ..., rollout_id: _Optional[str] = ..., phy2log: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("version", "rollout_id", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    rollout_id: str
    reason: str
    def __init__(self, version: _Optional[int] = ..., rollout_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Settings(_message.Message):
    __slots__ = ("report_interval_s", "agreement_period_steps", "layers_per_step")
    REPORT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_PERIOD_STEPS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    report_interval_s: float
    agreement_period_steps: int
    layers_per_step: int
    def __init__(self, report_interval_s: _Optional[float] = ..., agreement_period_steps: _Optional[int] = ..., layers_per_step: _Optional[int] = ...) -> None: ...

class GetPlacementRequest(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    def __init__(self, deployment: _Optional[str] = ...) -> None: ...

class PlacementReply(_message.Message):
    __slots__ = ("deployment", "version", "phy2log")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    version: int
    phy2log: Tensor
    def __init__(self, deployment: _Optional[str] = ..., version: _Optional[int] = ..., phy2log: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
