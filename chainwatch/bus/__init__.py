"""The bus: one small interface, an in-process implementation and a Kafka one."""

from chainwatch.bus.base import Bus, Consumer, Message, Topics
from chainwatch.bus.memory import EmbeddedBus

__all__ = ["Bus", "Consumer", "EmbeddedBus", "Message", "Topics"]
