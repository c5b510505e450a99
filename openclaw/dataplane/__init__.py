"""
The data plane: an OpenAI-compatible HTTP API that sends every call to the
active provider.

Applications written against the OpenAI API point their base URL at
C{http://gateway:API_PORT/v1}; the operator's C{switch_provider} decides who
answers, from the very next call.  The modules, each with one job:

- L{site<openclaw.dataplane.site>}: the C{twisted.web} site
  (L{build_site<openclaw.dataplane.site.build_site>} assembles it), its
  requests' limits; L{connection<openclaw.dataplane.connection>}: one
  client connection's deadlines and close; L{head<openclaw.dataplane.head>}:
  the checks of a request's head twisted.web leaves to its users.
- L{metrics_site<openclaw.dataplane.metrics_site>}: the C{/metrics}
  listener (C{--metrics-listen}).
- L{resource<openclaw.dataplane.resource>}: the C{twisted.web} resources.
- L{request<openclaw.dataplane.request>}: checking a chat request, choosing
  its route.
- L{call<openclaw.dataplane.call>}: carrying one call upstream and back,
  in the provider's chat format (its adapter's
  L{wire<openclaw.providers.wire>}).
- L{sse<openclaw.dataplane.sse>}: server-sent events in and out.
- L{auth<openclaw.dataplane.auth>}, L{errors<openclaw.dataplane.errors>},
  L{context<openclaw.dataplane.context>}.

This package imports nothing itself: the providers' chat formats use
L{request<openclaw.dataplane.request>} and L{sse<openclaw.dataplane.sse>},
and the data plane uses the providers.
"""
