"""interknit.dns: the registry served as an authoritative DNS zone (see docs/dns.md)."""

from interknit.dns.gslb import GslbConfig
from interknit.dns.rrl import RrlConfig
from interknit.dns.server import DnsServer
from interknit.dns.zone import Zone, ZoneConfig

__all__ = ["DnsServer", "GslbConfig", "RrlConfig", "Zone", "ZoneConfig"]
