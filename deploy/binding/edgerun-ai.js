// The service a Worker's `AI` binding talks to when it runs on an edgerun node instead of
// Cloudflare's inference service. workerd's `env.AI` (the `cloudflare-internal:ai-api` module,
// wrapped around an inner `fetcher` binding) sends every call to its fetcher as
// `https://workers-binding.ai/run?version=3`, `/ai-api/models/search`, ...; bound as that
// fetcher, this module sends the same request to the node (or the edgerun Worker in front of
// the nodes) at EDGERUN_URL, path and query unchanged, with EDGERUN_TOKEN as the bearer token
// (the binding itself sends none). The answer comes back untouched: bare JSON, or the event
// stream as it streams. See docs/api.md ("The Workers binding") for the workerd and `wrangler dev`
// configurations that use it.
export default {
  async fetch(request, env) {
    const from = new URL(request.url);
    const to = new URL(from.pathname + from.search, env.EDGERUN_URL);
    const headers = new Headers(request.headers);
    headers.delete('host');
    if (env.EDGERUN_TOKEN) headers.set('authorization', `Bearer ${env.EDGERUN_TOKEN}`);
    return fetch(to, {
      method: request.method,
      headers,
      body: request.method === 'GET' || request.method === 'HEAD' ? undefined : request.body,
      redirect: 'manual',
    });
  },
};
