// SnapLearn from a Node.js app: classify a photo with the vision server, wait until the
// recommender has learned from it, then ask what the student should practise next.
//
//   npm ci && npm run build
//   node dist/example.js --image photo.jpg --user student-42 [--vision host:port] [--recommender host:port]
//   SNAPLEARN_TOKEN=... node dist/example.js --tls-ca ca.pem --image photo.jpg --user school-a/s42
//
// With --tls-ca it speaks TLS (--tls-cert/--tls-key add a client certificate for mutual TLS;
// --server-name when the targets are addresses). A bearer token is read from SNAPLEARN_TOKEN,
// never from an argument, which any process listing shows.
// Prints the same lines as the Go and Java examples (tests/e2e/test_app_clients.py reads them).
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import {
  type CallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  credentials,
  Metadata,
  type ServiceError,
} from "@grpc/grpc-js";

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
const CALL_TIMEOUT_MS = 10_000;

// The token rides in each call's metadata (grpc-js attaches call credentials to TLS channels
// only, and plaintext stays allowed for localhost development).
function callMetadata(): Metadata {
  const metadata = new Metadata();
  const token = process.env.SNAPLEARN_TOKEN;
  if (token) metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

function channelCredentials(ca?: string, cert?: string, key?: string): ChannelCredentials {
  if ((cert === undefined) !== (key === undefined)) throw new Error("--tls-cert and --tls-key go together");
  if (ca === undefined) {
    if (cert !== undefined) throw new Error("--tls-cert needs --tls-ca");
    return credentials.createInsecure();
  }
  return credentials.createSsl(
    readFileSync(ca),
    key === undefined ? null : readFileSync(key),
    cert === undefined ? null : readFileSync(cert),
  );
}

function deadline(): CallOptions {
  // Every call gets a deadline: a server that is gone must not hang the app.
  return { deadline: new Date(Date.now() + CALL_TIMEOUT_MS) };
}

function classify(client: VisionServiceClient, request: ClassifyRequest): Promise<ClassifyResponse> {
  return new Promise((resolve, reject) =>
    client.classify(request, callMetadata(), deadline(), (error: ServiceError | null, reply: ClassifyResponse) =>
      error ? reject(error) : resolve(reply),
    ),
  );
}

function recommend(client: RecommenderServiceClient, request: RecommendRequest): Promise<RecommendResponse> {
  return new Promise((resolve, reject) =>
    client.recommend(request, callMetadata(), deadline(), (error: ServiceError | null, reply: RecommendResponse) =>
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
      "tls-ca": { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "server-name": { type: "string" },
    },
  });
  if (!values.image) {
    console.error("usage: node dist/example.js --image photo.jpg [--user id] [--vision host:port] [--recommender host:port]");
    process.exit(2);
  }
  const user = values.user;
  const k = Number(values.k);
  let channel: ChannelCredentials;
  try {
    channel = channelCredentials(values["tls-ca"], values["tls-cert"], values["tls-key"]);
  } catch (error) {
    console.error(error instanceof Error ? error.message : error);
    process.exit(2);
  }
  const options: ChannelOptions = { "grpc.service_config": SERVICE_CONFIG };
  const serverName = values["server-name"];
  if (serverName) {
    options["grpc.ssl_target_name_override"] = serverName;
    options["grpc.default_authority"] = serverName;
  }
  const vision = new VisionServiceClient(values.vision, channel, options);
  const recommender = new RecommenderServiceClient(values.recommender, channel, options);
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
