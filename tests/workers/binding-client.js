// A Worker written for Workers AI, unchanged: it calls `env.AI.run` (whole and streamed),
// `env.AI.models()`, and the npm `@cloudflare/ai` package's `new Ai(env.AI)`. tests/tests/binding.rs
// runs it in workerd with its `AI` binding pointed at an edgerun node (through
// deploy/binding/edgerun-ai.js) and compares what it gets with the node's own REST answers.
// POST bodies are the run inputs; `?model=` overrides the MODEL binding. Errors thrown by the
// binding come back as 500 {"thrown":{"name","message"}}.
import { Ai } from '@cloudflare/ai';

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const model = url.searchParams.get('model') ?? env.MODEL;
    const inputs = request.method === 'POST' ? await request.json() : {};
    try {
      switch (url.pathname) {
        case '/run': {
          const out = await env.AI.run(model, inputs);
          return Response.json({ out, lastRequestId: env.AI.lastRequestId });
        }
        case '/stream': {
          const stream = await env.AI.run(model, { ...inputs, stream: true });
          if (!(stream instanceof ReadableStream)) {
            return Response.json({ notAStream: stream }, { status: 500 });
          }
          return new Response(stream, { headers: { 'content-type': 'text/event-stream' } });
        }
        case '/legacy': {
          const ai = new Ai(env.AI);
          const out = await ai.run(model, inputs);
          return Response.json({ out, lastRequestId: ai.lastRequestId });
        }
        case '/legacy-stream': {
          const stream = await new Ai(env.AI).run(model, { ...inputs, stream: true });
          return new Response(stream, { headers: { 'content-type': 'text/event-stream' } });
        }
        case '/models':
          return Response.json(await env.AI.models(Object.fromEntries(url.searchParams)));
        default:
          return new Response('no such test route', { status: 404 });
      }
    } catch (e) {
      return Response.json({ thrown: { name: e.name, message: e.message } }, { status: 500 });
    }
  },
};
