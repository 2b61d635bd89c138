"""Health: active checks that decide each instance's check status, and passive outlier detection.

``machine`` and ``outlier`` are sans-IO cores; ``probes`` holds the HTTP and TCP probes;
``checker`` is the asyncio shell that schedules checks and reports status changes to a sink
(normally the registry's ``set_check_status``).
"""

from interknit.health.checker import HealthChecker, LagStats, Sink, TargetStats
from interknit.health.machine import CheckMachine
from interknit.health.outlier import OutlierDetector
from interknit.health.probes import ProbeResult, http_probe, tcp_probe

__all__ = [
    "CheckMachine",
    "HealthChecker",
    "LagStats",
    "OutlierDetector",
    "ProbeResult",
    "Sink",
    "TargetStats",
    "http_probe",
    "tcp_probe",
]
