// Index an image and search with it over gRPC from Node.js, straight from the contract.
//
//   npm ci && node search.js 127.0.0.1:50051 photo.jpg [collection]
//
// Prints one JSON object: the plugins the server offers, the id it stored the image under,
// and the hits of a search with the same image (best first).
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "protos", "imagesearch", "v1", "image_search_service.proto");

function loadService() {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, // field names as in the .proto (top_k, image_id, ...)
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).imagesearch.v1.ImageSearchService;
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30000 }, (error, response) => {
      if (error) {
        // Standard gRPC status codes: error.code (e.g. 3 = INVALID_ARGUMENT) and error.details.
        reject(new Error(`${method} failed: ${grpc.status[error.code]}: ${error.details}`));
      } else {
        resolve(response);
      }
    });
  });
}

async function main() {
  const [target, imagePath, collection = ""] = process.argv.slice(2);
  if (!target || !imagePath) {
    console.error("usage: node search.js HOST:PORT IMAGE [COLLECTION]");
    process.exit(2);
  }
  const Service = loadService();
  const client = new Service(target, grpc.credentials.createInsecure());
  const content = fs.readFileSync(imagePath);
  try {
    const plugins = await call(client, "ListPlugins", {});
    const added = await call(client, "AddImages", {
      collection,
      images: [{ id: path.basename(imagePath), content, label: "from-node", metadata: { client: "grpc-js" } }],
    });
    const found = await call(client, "Search", { collection, image: content, top_k: 3 });
    let badRequest = null;
    try {
      await call(client, "Search", { collection, image: Buffer.from("not an image"), top_k: 3 });
    } catch (error) {
      badRequest = error.message;
    }
    console.log(
      JSON.stringify({
        extractors: plugins.extractors.map((e) => e.name),
        ids: added.ids,
        hits: found.hits.map((h) => ({ id: h.id, score: h.score, label: h.label, metadata: h.metadata })),
        bad_request: badRequest,
      }),
    );
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(error.message);
  process.exit(1);
});
