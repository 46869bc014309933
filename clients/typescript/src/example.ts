// SnapLearn from a Node.js app: classify a photo with the vision server, wait until the
// recommender has learned from it, then ask what the student should practise next.
//
//   npm ci && npm run build
//   node dist/example.js --image photo.jpg --user student-42 [--vision host:port] [--recommender host:port]
//
// Prints the same lines as the Go and Java examples (tests/e2e/test_app_clients.py reads them).
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { type CallOptions, credentials, Metadata, type ServiceError } from "@grpc/grpc-js";

import {
  RecommenderServiceClient,
  type RecommendRequest,
  type RecommendResponse,
} from "./gen/snaplearn/recommender/v1/recommender";
import {
  type ClassifyRequest,
  type ClassifyResponse,
  VisionServiceClient,
} from "./gen/snaplearn/vision/v1/vision";

// round_robin spreads calls over every address the target resolves to (one per vision pod
// behind a headless Service); UNAVAILABLE (a pod restarting) is retried with backoff.
const SERVICE_CONFIG = JSON.stringify({
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [
    {
      name: [
        { service: "snaplearn.vision.v1.VisionService" },
        { service: "snaplearn.recommender.v1.RecommenderService" },
      ],
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: "0.1s",
        maxBackoff: "2s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
  ],
});
const CHANNEL_OPTIONS = { "grpc.service_config": SERVICE_CONFIG };
const CALL_TIMEOUT_MS = 10_000;

function deadline(): CallOptions {
  // Every call gets a deadline: a server that is gone must not hang the app.
  return { deadline: new Date(Date.now() + CALL_TIMEOUT_MS) };
}

function classify(client: VisionServiceClient, request: ClassifyRequest): Promise<ClassifyResponse> {
  return new Promise((resolve, reject) =>
    client.classify(request, new Metadata(), deadline(), (error: ServiceError | null, reply: ClassifyResponse) =>
      error ? reject(error) : resolve(reply),
    ),
  );
}

function recommend(client: RecommenderServiceClient, request: RecommendRequest): Promise<RecommendResponse> {
  return new Promise((resolve, reject) =>
    client.recommend(request, new Metadata(), deadline(), (error: ServiceError | null, reply: RecommendResponse) =>
      error ? reject(error) : resolve(reply),
    ),
  );
}

function recommendRequest(userId: string, k: number): RecommendRequest {
  return { userId, k, excludeSeen: false, filters: undefined };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      vision: { type: "string", default: "127.0.0.1:50051" },
      recommender: { type: "string", default: "127.0.0.1:50052" },
      image: { type: "string" },
      user: { type: "string", default: "typescript-example" },
      k: { type: "string", default: "5" },
      "wait-ms": { type: "string", default: "30000" },
    },
  });
  if (!values.image) {
    console.error("usage: node dist/example.js --image photo.jpg [--user id] [--vision host:port] [--recommender host:port]");
    process.exit(2);
  }
  const user = values.user;
  const k = Number(values.k);
  const vision = new VisionServiceClient(values.vision, credentials.createInsecure(), CHANNEL_OPTIONS);
  const recommender = new RecommenderServiceClient(values.recommender, credentials.createInsecure(), CHANNEL_OPTIONS);
  try {
    const before = await recommend(recommender, recommendRequest(user, 1));
    const classified = await classify(vision, {
      userId: user,
      image: readFileSync(values.image),
      topK: 3,
      modelName: "",
      modelVersion: "",
      requestId: "",
    });
    const top = classified.labels[0];
    if (!top) throw new Error("classify returned no labels");
    console.log(
      `classified as ${top.label} (score ${top.score.toFixed(3)}, model ${classified.modelName} v${classified.modelVersion})`,
    );

    // The photo reaches the recommender as an event; poll until a snapshot has applied it.
    const waitUntil = Date.now() + Number(values["wait-ms"]);
    for (;;) {
      const reply = await recommend(recommender, recommendRequest(user, k));
      if (reply.eventsApplied > before.eventsApplied && !reply.coldStart) {
        console.log(
          `recommendations for ${user} (snapshot ${reply.modelVersion}, ${reply.eventsApplied} events applied, cold start ${reply.coldStart}):`,
        );
        reply.items.forEach((item, i) =>
          console.log(`  ${i + 1}. ${item.title} [${item.concepts.join(", ")}] ${item.reason}`),
        );
        return;
      }
      if (Date.now() > waitUntil) throw new Error("the recommender did not apply the photo's event in time");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  } finally {
    vision.close();
    recommender.close();
  }
}

main().catch((error: unknown) => {
  console.error("error:", error instanceof Error ? error.message : error);
  process.exit(1);
});
