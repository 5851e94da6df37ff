"""Request dependencies: the process runtime and a database session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.api_runtime import ApiRuntime


async def get_runtime(request: Request) -> ApiRuntime:  # async: no thread hop for a lookup
    return request.app.state.runtime


RuntimeDep = Annotated[ApiRuntime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.infra.factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
