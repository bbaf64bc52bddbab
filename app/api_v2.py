"""Open Inference Protocol (KServe v2) routes."""

from fastapi import APIRouter

router = APIRouter(prefix="/v2", tags=["v2"])
