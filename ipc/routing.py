"""Which API process gets which output: the engine core's side of ``--api-server-count N``.

Each API process has its own output socket; a request's outputs go to the process that sent it
(``EngineRequest.client_index``), a utility call's reply to its caller. Scheduler stats go to every process (each
shows the same gauges; only process 0 counts the core's counters, see ``frontend/metrics.py``), as do READY and
``EngineDead``. One step makes at most one message per API process. Pure bookkeeping, no sockets: tested alone.
"""

from __future__ import annotations

from ipc.messages import EngineMessage, EngineOutputs, EngineRequest


class OutputRouter:
    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        # request id -> [client index, sequences not finished yet]
        self._owners: dict[str, list[int]] = {}

    def add_request(self, request: EngineRequest) -> None:
        self._owners[request.request_id] = [request.client_index, request.sampling_params.n]

    def owner(self, request_id: str) -> int:
        entry = self._owners.get(request_id)
        return entry[0] if entry is not None else 0

    def __len__(self) -> int:
        return len(self._owners)

    def route(self, message: EngineMessage) -> list[tuple[int, EngineMessage]]:
        """(client index, message) pairs for one message of the core: split per owner, or to everyone."""
        if self.num_clients == 1:
            return [(0, message)]
        if not isinstance(message, EngineOutputs):  # READY, EngineDead: every process needs it
            return [(client, message) for client in range(self.num_clients)]
        parts: dict[int, EngineOutputs] = {}

        def part(client: int) -> EngineOutputs:
            found = parts.get(client)
            if found is None:
                found = parts[client] = EngineOutputs(outputs=[], scheduler_stats=message.scheduler_stats,
                                                      timestamp=message.timestamp, errors=[])
            return found

        for out in message.outputs:
            entry = self._owners.get(out.request_id)
            if entry is None:
                continue  # already finished or never admitted here: nobody waits for it
            part(entry[0]).outputs.append(out)
            if out.finish_reason is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._owners[out.request_id]
        for error in message.errors:
            entry = self._owners.pop(error.request_id, None)
            # A request the core never admitted (its frame did not decode) has no known owner: tell everyone,
            # the others ignore an id they do not hold.
            for client in [entry[0]] if entry is not None else range(self.num_clients):
                part(client).errors.append(error)
        if message.utility_output is not None:
            part(message.utility_output.client_index).utility_output = message.utility_output
        if message.scheduler_stats is not None:
            for client in range(self.num_clients):
                part(client)
        return sorted(parts.items())
