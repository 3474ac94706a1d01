import asyncio
from typing import Any
from outbox_relay.replication import subscribe, unsubscribe
from tests.conftest import OutboxEnv

async def test_probe(outbox_env: OutboxEnv, service: Any, primary: Any) -> None:
    s = outbox_env.settings()
    res = await asyncio.gather(subscribe(s), subscribe(s), return_exceptions=True)
    print("RES", res)
    print(await primary.fetch("select slot_name, active from pg_replication_slots"))
    print(await service.fetch("select subname, subenabled from pg_subscription"))
