#!/usr/bin/env node
// A static file server for the demo page, with no dependencies: serves the repository root (so
// the page at /web/ can fetch the example data set from /data/) on 127.0.0.1 only.
//
//   node web/serve.mjs [--port 8000] [--root DIR]       then open http://127.0.0.1:8000/web/
//
// WebGPU needs a secure context, which http://127.0.0.1 and http://localhost are. The browser
// test imports startServer() and serves on a free port.

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.jsonl': 'application/jsonl; charset=utf-8',
  '.jinja': 'text/plain; charset=utf-8',
  '.txt': 'text/plain; charset=utf-8',
  '.md': 'text/markdown; charset=utf-8',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ts': 'text/plain; charset=utf-8',
};

/** The repository root (this file lives in <root>/web/). */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/**
 * Serves `root` on 127.0.0.1:`port` (0 = any free port). Resolves to { server, port, url }.
 * Paths that leave `root` get 403; a folder serves its index.html.
 */
export function startServer({ root = REPO_ROOT, port = 0, quiet = true } = {}) {
  const base = path.resolve(root);
  const server = http.createServer((req, res) => {
    let rel;
    try {
      rel = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    } catch {
      res.writeHead(400).end('bad url');
      return;
    }
    let file = path.resolve(base, '.' + rel);
    if (file !== base && !file.startsWith(base + path.sep)) {
      res.writeHead(403).end('outside the served folder');
      return;
    }
    fs.stat(file, (err, st) => {
      if (!err && st.isDirectory()) {
        if (!rel.endsWith('/')) {
          res.writeHead(301, { Location: rel + '/' }).end();
          return;
        }
        file = path.join(file, 'index.html');
      }
      fs.readFile(file, (err2, data) => {
        if (err2) {
          if (!quiet) console.log(`404 ${rel}`);
          res.writeHead(404, { 'Content-Type': 'text/plain' }).end(`not found: ${rel}`);
          return;
        }
        res.writeHead(200, {
          'Content-Type': TYPES[path.extname(file).toLowerCase()] || 'application/octet-stream',
          'Cache-Control': 'no-store',
        });
        res.end(data);
        if (!quiet) console.log(`200 ${rel}`);
      });
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      const p = server.address().port;
      resolve({ server, port: p, url: `http://127.0.0.1:${p}` });
    });
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const opt = (name, dflt) => {
    const i = args.indexOf(name);
    return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
  };
  const port = Number(opt('--port', '8000'));
  const root = opt('--root', REPO_ROOT);
  const { url } = await startServer({ root, port, quiet: false });
  console.log(`serving ${path.resolve(root)} at ${url}/ ; the demo: ${url}/web/`);
}
