"""twistd plugins: ``twistd pothead-hub`` and ``twistd pothead-worker``."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from pothead.plugin import HubOptions, WorkerOptions, make_hub_service, make_worker_service


@implementer(IServiceMaker, IPlugin)
class _Maker:
    def __init__(self, tapname, description, options, make):
        self.tapname = tapname
        self.description = description
        self.options = options
        self._make = make

    def makeService(self, options):
        return self._make(options)


hub = _Maker(
    "pothead-hub",
    "pothead hub: central FIFO queue that hands consumer requests to reverse-connected workers",
    HubOptions,
    make_hub_service,
)
worker = _Maker(
    "pothead-worker",
    "pothead worker: serves a WSGI app over connections it opens to pothead hubs",
    WorkerOptions,
    make_worker_service,
)
