package dev.snaplearn.example;

import io.grpc.ChannelCredentials;
import io.grpc.ClientInterceptor;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.TlsChannelCredentials;
import io.grpc.stub.MetadataUtils;
import java.io.File;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import snaplearn.recommender.v1.Recommender.RecommendRequest;
import snaplearn.recommender.v1.Recommender.RecommendResponse;
import snaplearn.recommender.v1.Recommender.RecommendedItem;
import snaplearn.recommender.v1.RecommenderServiceGrpc;
import snaplearn.vision.v1.Vision.ClassifyRequest;
import snaplearn.vision.v1.Vision.ClassifyResponse;
import snaplearn.vision.v1.Vision.LabelScore;
import snaplearn.vision.v1.VisionServiceGrpc;

/**
 * SnapLearn from a Java app: classify a photo with the vision server, wait until the recommender
 * has learned from it, then ask what the student should practise next.
 *
 * <pre>
 *   java -jar target/snaplearn-client-example.jar -image photo.jpg -user student-42 \
 *       [-vision host:port] [-recommender host:port]
 *   SNAPLEARN_TOKEN=... java -jar target/snaplearn-client-example.jar -tls-ca ca.pem \
 *       -image photo.jpg -user school-a/s42
 * </pre>
 *
 * <p>With -tls-ca it speaks TLS (-tls-cert/-tls-key, a PKCS#8 PEM key, add a client certificate
 * for mutual TLS; -server-name when the targets are addresses). A bearer token is read from
 * SNAPLEARN_TOKEN, never from an argument, which any process listing shows.
 *
 * <p>Prints the same lines as the Go and TypeScript examples (tests/e2e/test_app_clients.py reads
 * them).
 */
public final class SnapLearnExample {
  private static final long CALL_TIMEOUT_MS = 10_000;

  // round_robin spreads calls over every address the target resolves to (one per vision pod
  // behind a headless Service); UNAVAILABLE (a pod restarting) is retried with backoff.
  private static final Map<String, Object> SERVICE_CONFIG =
      Map.of(
          "loadBalancingConfig", List.of(Map.of("round_robin", Map.of())),
          "methodConfig",
              List.of(
                  Map.of(
                      "name",
                      List.of(
                          Map.of("service", "snaplearn.vision.v1.VisionService"),
                          Map.of("service", "snaplearn.recommender.v1.RecommenderService")),
                      "retryPolicy",
                      Map.of(
                          "maxAttempts", 4.0,
                          "initialBackoff", "0.1s",
                          "maxBackoff", "2s",
                          "backoffMultiplier", 2.0,
                          "retryableStatusCodes", List.of("UNAVAILABLE")))));

  private SnapLearnExample() {}

  public static void main(String[] args) throws Exception {
    String visionTarget = "127.0.0.1:50051";
    String recommenderTarget = "127.0.0.1:50052";
    String image = null;
    String user = "java-example";
    int k = 5;
    long waitMs = 30_000;
    String tlsCa = null;
    String tlsCert = null;
    String tlsKey = null;
    String serverName = null;
    for (int i = 0; i + 1 < args.length; i += 2) {
      switch (args[i]) {
        case "-vision" -> visionTarget = args[i + 1];
        case "-recommender" -> recommenderTarget = args[i + 1];
        case "-image" -> image = args[i + 1];
        case "-user" -> user = args[i + 1];
        case "-k" -> k = Integer.parseInt(args[i + 1]);
        case "-wait-ms" -> waitMs = Long.parseLong(args[i + 1]);
        case "-tls-ca" -> tlsCa = args[i + 1];
        case "-tls-cert" -> tlsCert = args[i + 1];
        case "-tls-key" -> tlsKey = args[i + 1];
        case "-server-name" -> serverName = args[i + 1];
        default -> usage("unknown option " + args[i]);
      }
    }
    if (image == null || args.length % 2 != 0) {
      usage("-image is required");
    }
    if ((tlsCert == null) != (tlsKey == null)) {
      usage("-tls-cert and -tls-key go together");
    }
    if (tlsCert != null && tlsCa == null) {
      usage("-tls-cert needs -tls-ca");
    }
    ChannelCredentials credentials = credentials(tlsCa, tlsCert, tlsKey);
    String token = System.getenv("SNAPLEARN_TOKEN");
    ManagedChannel visionChannel = channel(visionTarget, credentials, serverName, token);
    ManagedChannel recommenderChannel = channel(recommenderTarget, credentials, serverName, token);
    try {
      run(visionChannel, recommenderChannel, Files.readAllBytes(Path.of(image)), user, k, waitMs);
    } finally {
      visionChannel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
      recommenderChannel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  private static void usage(String problem) {
    System.err.println(problem);
    System.err.println(
        "usage: snaplearn-client-example -image photo.jpg [-user id] [-vision host:port]"
            + " [-recommender host:port] [-k n]");
    System.exit(2);
  }

  private static ChannelCredentials credentials(String ca, String cert, String key)
      throws IOException {
    if (ca == null) {
      return InsecureChannelCredentials.create();
    }
    TlsChannelCredentials.Builder tls = TlsChannelCredentials.newBuilder().trustManager(new File(ca));
    if (cert != null) {
      tls.keyManager(new File(cert), new File(key));
    }
    return tls.build();
  }

  private static ManagedChannel channel(
      String target, ChannelCredentials credentials, String serverName, String token) {
    ManagedChannelBuilder<?> builder =
        Grpc.newChannelBuilder(target, credentials)
            .defaultServiceConfig(SERVICE_CONFIG)
            .enableRetry();
    if (serverName != null) {
      builder.overrideAuthority(serverName);
    }
    if (token != null && !token.isEmpty()) {
      Metadata headers = new Metadata();
      headers.put(
          Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + token);
      ClientInterceptor bearer = MetadataUtils.newAttachHeadersInterceptor(headers);
      builder.intercept(bearer);
    }
    return builder.build();
  }

  private static void run(
      ManagedChannel visionChannel,
      ManagedChannel recommenderChannel,
      byte[] image,
      String user,
      int k,
      long waitMs)
      throws InterruptedException {
    // Every call gets a deadline: a server that is gone must not hang the app.
    var vision = VisionServiceGrpc.newBlockingStub(visionChannel);
    var recommender = RecommenderServiceGrpc.newBlockingStub(recommenderChannel);

    RecommendResponse before =
        recommender
            .withDeadlineAfter(CALL_TIMEOUT_MS, TimeUnit.MILLISECONDS)
            .recommend(RecommendRequest.newBuilder().setUserId(user).setK(1).build());

    ClassifyResponse classified =
        vision
            .withDeadlineAfter(CALL_TIMEOUT_MS, TimeUnit.MILLISECONDS)
            .classify(
                ClassifyRequest.newBuilder()
                    .setUserId(user)
                    .setImage(com.google.protobuf.ByteString.copyFrom(image))
                    .setTopK(3)
                    .build());
    if (classified.getLabelsCount() == 0) {
      throw new IllegalStateException("classify returned no labels");
    }
    LabelScore top = classified.getLabels(0);
    System.out.printf(
        "classified as %s (score %.3f, model %s v%s)%n",
        top.getLabel(), top.getScore(), classified.getModelName(), classified.getModelVersion());

    // The photo reaches the recommender as an event; poll until a snapshot has applied it.
    long waitUntil = System.currentTimeMillis() + waitMs;
    while (true) {
      RecommendResponse reply =
          recommender
              .withDeadlineAfter(CALL_TIMEOUT_MS, TimeUnit.MILLISECONDS)
              .recommend(RecommendRequest.newBuilder().setUserId(user).setK(k).build());
      if (reply.getEventsApplied() > before.getEventsApplied() && !reply.getColdStart()) {
        print(user, reply);
        return;
      }
      if (System.currentTimeMillis() > waitUntil) {
        throw new IllegalStateException("the recommender did not apply the photo's event in time");
      }
      Thread.sleep(50);
    }
  }

  private static void print(String user, RecommendResponse reply) {
    System.out.printf(
        "recommendations for %s (snapshot %s, %d events applied, cold start %b):%n",
        user, reply.getModelVersion(), reply.getEventsApplied(), reply.getColdStart());
    int rank = 1;
    for (RecommendedItem item : reply.getItemsList()) {
      System.out.printf(
          "  %d. %s [%s] %s%n",
          rank++, item.getTitle(), String.join(", ", item.getConceptsList()), item.getReason());
    }
  }
}
