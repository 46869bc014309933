package main

import (
	"context"
	"fmt"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	visionv1 "github.com/snaplearn/snaplearn/protos/go/gen/snaplearn/vision/v1"
)

func withToken(token string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token)
}

func TestEachCallersItemsGoOnAStreamOpenedWithItsOwnToken(t *testing.T) {
	f := start(t, 256, "--backend-connections", "1")
	var wg sync.WaitGroup
	errs := make(chan error, 60)
	for i := range 60 {
		token := fmt.Sprintf("school-%d", i%3)
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := metadata.AppendToOutgoingContext(withToken(token), "x-test", "not-for-the-others")
			user := fmt.Sprintf("tokens-%d", i)
			if _, err := classify(f, ctx, user); err != nil {
				errs <- err
			}
		}()
	}
	ctx := context.Background() // no token (development): a stream of its own too
	if _, err := classify(f, ctx, "tokens-none"); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	streamsByToken := map[string]map[int64]bool{}
	for i := range 60 {
		user := fmt.Sprintf("tokens-%d", i)
		auth, _ := f.backend.authOf.Load(user)
		if want := fmt.Sprintf("Bearer school-%d", i%3); auth != want {
			t.Fatalf("%s's item came on a stream opened with %q, want %q", user, auth, want)
		}
		n, _ := f.backend.streamOf.Load(user)
		if streamsByToken[auth.(string)] == nil {
			streamsByToken[auth.(string)] = map[int64]bool{}
		}
		streamsByToken[auth.(string)][n.(int64)] = true
	}
	if auth, _ := f.backend.authOf.Load("tokens-none"); auth != "" {
		t.Fatalf("a call without a token went on a stream opened with %q", auth)
	}
	seen := map[int64]string{}
	for auth, streams := range streamsByToken {
		for n := range streams {
			if other, ok := seen[n]; ok {
				t.Fatalf("stream %d carried the items of %q and %q", n, other, auth)
			}
			seen[n] = auth
		}
	}
	if n := f.proxy.conns[0].mux.credentials(); n != 4 {
		t.Fatalf("%d credentials with a stream, want 4 (3 tokens and none)", n)
	}
}

func TestATokensStreamIsClosedOnceIdleAndReopenedWhenNeeded(t *testing.T) {
	f := start(t, 8, "--backend-connections", "1", "--stream-idle", "0.05")
	opened, ended := streamsOpened.Load(), streamsEnded.Load()
	if _, err := classify(f, withToken("idle-school"), "idle-1"); err != nil {
		t.Fatal(err)
	}
	pool := f.proxy.conns[0].mux
	waitFor(t, "the idle stream to be closed", func() bool {
		return pool.credentials() == 0 && streamsEnded.Load()-ended == 1 && pool.idleClosed.Load() == 1
	})
	if _, err := classify(f, withToken("idle-school"), "idle-2"); err != nil {
		t.Fatal(err)
	}
	if n := streamsOpened.Load() - opened; n != 2 {
		t.Fatalf("%d streams opened, want 2", n)
	}
	recorder := httptest.NewRecorder()
	f.proxy.metricsHandler(recorder, httptest.NewRequest("GET", "/metrics", nil))
	if !strings.Contains(recorder.Body.String(), "snaplearn_gateway_classify_streams_idle_closed_total 1\n") {
		t.Fatalf("metrics:\n%s", recorder.Body.String())
	}
}

func TestAStreamInUseIsNotClosedForIdleness(t *testing.T) {
	f := start(t, 8, "--backend-connections", "1", "--stream-idle", "0.01")
	results := make(chan error, 1)
	go func() { _, err := classify(f, withToken("busy-school"), "held-while-idle-passes"); results <- err }()
	<-f.backend.entered
	pool := f.proxy.conns[0].mux
	pool.sweep(time.Now().Add(time.Hour)) // however long ago: a caller still holds it
	if n := pool.credentials(); n != 1 {
		t.Fatalf("%d credentials, want 1", n)
	}
	close(f.backend.release)
	if err := <-results; err != nil {
		t.Fatal(err)
	}
}

func TestAStreamRefusedForItsTokenGivesItsCallersTheServersStatus(t *testing.T) {
	f := start(t, 8, "--backend-connections", "1")
	_, err := classify(f, withToken("refused"), "refused-1")
	if status.Code(err) != codes.Unauthenticated || status.Convert(err).Message() != "the token is not valid" {
		t.Fatalf("got %v", err)
	}
	var trailer metadata.MD
	_, err = classify(f, withToken("limited"), "limited-1", grpc.Trailer(&trailer))
	if status.Code(err) != codes.ResourceExhausted || trailer.Get("grpc-retry-pushback-ms")[0] != "250" {
		t.Fatalf("got %v, trailer %v", err, trailer)
	}
	// Another caller on the same connection is not affected, nor is the process unnamed.
	if _, err := classify(f, withToken("good"), "after-the-refusals"); err != nil {
		t.Fatal(err)
	}
}

func TestARefusedStreamDoesNotUnnameTheConnection(t *testing.T) {
	_, _, _, addr := heldServer(t, "worker-z")
	p, conn := gateway(t, "--backend", addr, "--backend-connections", "1")
	f := &fixture{proxy: p, conn: conn}
	f.client = visionClient(conn)
	if _, err := classify(f, withToken("good"), "name-it"); err != nil {
		t.Fatal(err)
	}
	pool := p.conns[0].mux
	waitFor(t, "the process to be named", func() bool { return pool.backendInstance() == "worker-z" })
	if _, err := classify(f, withToken("refused"), "refused-2"); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("got %v", err)
	}
	if got := pool.backendInstance(); got != "worker-z" {
		t.Fatalf("the connection's process is %q after a refused stream", got)
	}
}

func TestCallersBeyondMaxTokenStreamsAreForwardedAsCallsWithTheirToken(t *testing.T) {
	f := start(t, 8, "--backend-connections", "1", "--max-token-streams", "1")
	results := make(chan error, 1)
	go func() { _, err := classify(f, withToken("first"), "held-holds-the-slot"); results <- err }()
	<-f.backend.entered
	if _, err := classify(f, withToken("second"), "overflow-1"); err != nil {
		t.Fatal(err)
	}
	if auth, _ := f.backend.authOf.Load("overflow-1"); auth != "Bearer second" {
		t.Fatalf("the forwarded call came with %q", auth)
	}
	if n := f.proxy.stats.overflowed.Load(); n != 1 {
		t.Fatalf("overflowed %d, want 1", n)
	}
	close(f.backend.release)
	if err := <-results; err != nil {
		t.Fatal(err)
	}
}

func TestRequireTokenRefusesTokenlessCallsButNotProbes(t *testing.T) {
	f := start(t, 8, "--require-token")
	_, err := classify(f, context.Background(), "no-token")
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(status.Convert(err).Message(), "Bearer") {
		t.Fatalf("got %v", err)
	}
	if _, seen := f.backend.authOf.Load("no-token"); seen {
		t.Fatal("a tokenless call reached the backend")
	}
	if _, err := classify(f, withToken("any"), "with-token"); err != nil {
		t.Fatal(err)
	}
	if _, err := healthpb.NewHealthClient(f.conn).Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("a probe without a token: %v", err)
	}
	if n := f.proxy.stats.tokenless.Load(); n != 1 {
		t.Fatalf("tokenless refusals %d, want 1", n)
	}
}

func waitFor(t *testing.T, what string, done func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !done() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func visionClient(conn *grpc.ClientConn) visionv1.VisionServiceClient {
	return visionv1.NewVisionServiceClient(conn)
}
