"""twistd plugin for Jano: `twistd jano`. Kept tiny so plugin scans stay cheap."""

from twisted.application.service import ServiceMaker

jano = ServiceMaker(
    "Jano",
    "jano.tap",
    "A swap-minimising router in front of local LLM model servers.",
    "jano",
)
