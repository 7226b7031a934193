"""The stop page: rendering (templates, languages, HTTP semantics) and its small server.

    renderer = Renderer(settings.stoppage)
    page = renderer.render(verdict, host=..., accept=..., accept_language=...,
                           sec_fetch_dest=...)      # -> StopPage(451, headers, body)

`server.StopPageServer` answers every request it receives with the page for the
requested host (the name a DNS `stoppage` answer pointed here).
"""

from netfilter.stoppage.render import Renderer, StopPage, choose_language, wants_html

__all__ = ["Renderer", "StopPage", "choose_language", "wants_html"]
