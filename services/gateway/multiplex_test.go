package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	visionv1 "github.com/snaplearn/snaplearn/protos/go/gen/snaplearn/vision/v1"
)

// streamsOpened and streamsEnded count the held backend's ClassifyStream calls; endedOnce
// makes the first "shutting-down-once" item end its stream unanswered.
var (
	streamsOpened, streamsEnded atomic.Int64
	endedOnce                   atomic.Bool
)

// ClassifyStream serves each item as the held backend's Classify (in its own goroutine, with
// the item's timeout as its deadline, cancelled by cancel_ids), decoding what the gateway
// encoded by hand with the generated types.
func (b *heldBackend) ClassifyStream(stream grpc.BidiStreamingServer[visionv1.ClassifyStreamRequest, visionv1.ClassifyStreamResponse]) error {
	streamNo := streamsOpened.Add(1)
	defer streamsEnded.Add(1)
	md, _ := metadata.FromIncomingContext(stream.Context())
	auth := strings.Join(md.Get("authorization"), ",")
	switch auth {
	case "Bearer refused": // like the server's interceptor: refused before the handler names itself
		return status.Error(codes.Unauthenticated, "the token is not valid")
	case "Bearer limited":
		stream.SetTrailer(metadata.Pairs("grpc-retry-pushback-ms", "250"))
		return status.Error(codes.ResourceExhausted, "rate limit for this caller; retry in 250 ms")
	}
	if b.instance != "" {
		if err := stream.SendHeader(metadata.Pairs(instanceHeader, b.instance)); err != nil {
			return err
		}
	}
	carried := false
	var sendMu, itemsMu sync.Mutex
	cancels := map[uint64]context.CancelFunc{}
	var items sync.WaitGroup
	for {
		message, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			items.Wait()
			return nil
		}
		if err != nil {
			return err
		}
		if n := len(message.GetItems()); n > 0 {
			b.messages.Add(1)
			b.items.Add(int64(n))
			if !carried {
				carried = true
				b.itemStreams.Add(1)
			}
		}
		for _, id := range message.GetCancelIds() {
			itemsMu.Lock()
			if cancel := cancels[id]; cancel != nil {
				cancel()
			}
			itemsMu.Unlock()
		}
		for _, item := range message.GetItems() {
			b.streamOf.Store(item.GetRequest().GetUserId(), streamNo)
			b.authOf.Store(item.GetRequest().GetUserId(), auth)
			if item.GetRequest().GetUserId() == "shutting-down-once" && endedOnce.CompareAndSwap(false, true) {
				return nil // like a server shutting down: ends OK without starting this item
			}
			ctx, cancel := context.WithCancel(stream.Context())
			if ms := item.GetTimeoutMs(); ms > 0 {
				ctx, cancel = context.WithTimeout(stream.Context(), time.Duration(ms*float64(time.Millisecond)))
			}
			itemsMu.Lock()
			cancels[item.GetId()] = cancel
			itemsMu.Unlock()
			items.Add(1)
			go func() {
				defer items.Done()
				response, err := b.Classify(ctx, item.GetRequest())
				result := &visionv1.ClassifyStreamResult{Id: item.GetId(), Response: response}
				if err != nil {
					result = &visionv1.ClassifyStreamResult{Id: item.GetId(), Code: int32(status.Code(err)), Message: status.Convert(err).Message()}
				}
				itemsMu.Lock()
				cancels[item.GetId()]()
				delete(cancels, item.GetId())
				itemsMu.Unlock()
				sendMu.Lock()
				defer sendMu.Unlock()
				_ = stream.Send(&visionv1.ClassifyStreamResponse{Results: []*visionv1.ClassifyStreamResult{result}})
			}()
		}
	}
}

func TestClassifyCallsBecomeItemsOfOneStreamPerConnection(t *testing.T) {
	opened := streamsOpened.Load()
	f := start(t, 64) // --backend-connections 2, --classify-stream on by default
	classifyAtOnce(t, f.client, "student", 40)
	// The backend's own error, code and message, comes back as the call's status.
	_, err := classify(f, context.Background(), "")
	if status.Code(err) != codes.InvalidArgument || status.Convert(err).Message() != "user_id is required" {
		t.Fatalf("got %v", err)
	}
	if n := streamsOpened.Load() - opened; n < 1 || n > 2 {
		t.Fatalf("%d streams opened for 41 calls over 2 connections", n)
	}
	if ok, invalid := f.proxy.stats.byCode[codes.OK].Load(), f.proxy.stats.byCode[codes.InvalidArgument].Load(); ok != 40 || invalid != 1 {
		t.Fatalf("OK %d, INVALID_ARGUMENT %d", ok, invalid)
	}
	recorder := httptest.NewRecorder()
	f.proxy.metricsHandler(recorder, httptest.NewRequest("GET", "/metrics", nil))
	line := fmt.Sprintf("snaplearn_gateway_classify_streams_opened_total %d\n", streamsOpened.Load()-opened)
	if !strings.Contains(recorder.Body.String(), line) {
		t.Fatalf("metrics lack %q:\n%s", line, recorder.Body.String())
	}
}

func TestACallerThatGoesAwayCancelsItsItem(t *testing.T) {
	f := start(t, 8)
	ctx, cancel := context.WithCancel(context.Background())
	results := make(chan error, 1)
	go func() { _, err := classify(f, ctx, "held-then-cancelled"); results <- err }()
	itemCtx := <-f.backend.entered
	if _, ok := itemCtx.Deadline(); ok {
		t.Fatal("an item without a deadline got one")
	}
	cancel()
	if err := <-results; status.Code(err) != codes.Canceled {
		t.Fatalf("got %v", err)
	}
	select {
	case <-itemCtx.Done(): // the gateway sent its id in cancel_ids
	case <-time.After(10 * time.Second):
		t.Fatal("the backend's item was not cancelled")
	}
}

func TestAnOldStreamFinishesItsItemsWhileANewOneTakesNewCalls(t *testing.T) {
	opened, ended := streamsOpened.Load(), streamsEnded.Load()
	f := start(t, 8, "--stream-max-age", "0.000001", "--backend-connections", "1")
	results := make(chan error, 2)
	go func() { _, err := classify(f, context.Background(), "held-on-the-first-stream"); results <- err }()
	<-f.backend.entered
	if _, err := classify(f, context.Background(), "on-the-second"); err != nil {
		t.Fatal(err)
	}
	close(f.backend.release)
	if err := <-results; err != nil {
		t.Fatal(err)
	}
	if n := streamsOpened.Load() - opened; n != 2 {
		t.Fatalf("%d streams opened, want 2", n)
	}
	deadline := time.Now().Add(10 * time.Second)
	for streamsEnded.Load()-ended < 1 { // the first, retired and empty, was closed by the gateway
		if time.Now().After(deadline) {
			t.Fatal("the retired stream was never closed")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestItemsOnABrokenStreamFailUnavailableAndNothingHangs(t *testing.T) {
	f := start(t, 8)
	results := make(chan error, 1)
	go func() { _, err := classify(f, context.Background(), "held-when-the-backend-dies"); results <- err }()
	<-f.backend.entered
	f.server.Stop() // closes the connections under the stream
	select {
	case err := <-results:
		if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "stream ended") {
			t.Fatalf("got %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the call hung on a broken stream")
	}
}

func TestStreamMessagesRoundTrip(t *testing.T) {
	deadline := time.Now().Add(1500 * time.Millisecond)
	request, err := protoMarshal(&visionv1.ClassifyRequest{UserId: "u", Image: []byte{1, 2}})
	if err != nil {
		t.Fatal(err)
	}
	calls := []*muxCall{{id: 7, request: request, deadline: deadline}, {id: 300, request: nil}}
	buf := encodeStreamRequest(nil, calls, []uint64{5, 1 << 40}, deadline.Add(-time.Second))
	var decoded visionv1.ClassifyStreamRequest
	if err := protoUnmarshal(buf, &decoded); err != nil {
		t.Fatal(err)
	}
	items := decoded.GetItems()
	if len(items) != 2 || items[0].GetId() != 7 || items[1].GetId() != 300 || items[0].GetTimeoutMs() != 1000 ||
		items[1].GetTimeoutMs() != 0 || items[0].GetRequest().GetUserId() != "u" {
		t.Fatalf("%v", &decoded)
	}
	if ids := decoded.GetCancelIds(); len(ids) != 2 || ids[1] != 1<<40 {
		t.Fatalf("cancel ids %v", ids)
	}
	response := &visionv1.ClassifyStreamResponse{Results: []*visionv1.ClassifyStreamResult{
		{Id: 1, Response: &visionv1.ClassifyResponse{RequestId: "r"}},
		{Id: 2, Code: int32(codes.ResourceExhausted), Message: "full"},
	}}
	data, err := protoMarshal(response)
	if err != nil {
		t.Fatal(err)
	}
	got := map[uint64]muxResult{}
	if err := decodeStreamResponse(data, func(id uint64, r muxResult) { got[id] = r }); err != nil {
		t.Fatal(err)
	}
	var first visionv1.ClassifyResponse
	if err := protoUnmarshal(got[1].response, &first); err != nil || first.GetRequestId() != "r" || got[1].code != codes.OK {
		t.Fatalf("%v %v", got[1], err)
	}
	if got[2].code != codes.ResourceExhausted || got[2].message != "full" {
		t.Fatalf("%v", got[2])
	}
}

func protoUnmarshal(data []byte, m proto.Message) error { return proto.Unmarshal(data, m) }
func protoMarshal(m proto.Message) ([]byte, error)      { return proto.Marshal(m) }

func TestACallerWaitsForAnUnansweringBackendOnlyUntilItsDeadline(t *testing.T) {
	// A backend that accepts connections and never says a word: the gateway's connection
	// stays CONNECTING, so opening the stream would wait for grpc's connect timeout (20 s).
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { listener.Close() })
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { conn.Close() })
		}
	}()
	_, conn := gateway(t, "--backend", listener.Addr().String())
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	began := time.Now()
	_, err = visionv1.NewVisionServiceClient(conn).Classify(ctx, &visionv1.ClassifyRequest{UserId: "u"})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("got %v", err)
	}
	if elapsed := time.Since(began); elapsed > 5*time.Second {
		t.Fatalf("the caller waited %v", elapsed)
	}
}

func TestItemsAStreamEndedUnansweredGoToANewStream(t *testing.T) {
	endedOnce.Store(false)
	f := start(t, 8, "--backend-connections", "1")
	opened := streamsOpened.Load()
	reply, err := classify(f, context.Background(), "shutting-down-once")
	if err != nil || reply.GetLabels()[0].GetLabel() != "topic-of-shutting-down-once" {
		t.Fatalf("got %v, %v", reply, err)
	}
	if n := streamsOpened.Load() - opened; n != 2 {
		t.Fatalf("%d streams opened, want 2 (the first ended by the server)", n)
	}
}

// classifyAtOnce makes n concurrent calls for users prefix-0..prefix-(n-1), each of which must
// be answered with its own label; it returns the users.
func classifyAtOnce(t *testing.T, client visionv1.VisionServiceClient, prefix string, n int) []string {
	t.Helper()
	users := make([]string, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		users[i] = fmt.Sprintf("%s-%d", prefix, i)
		wg.Add(1)
		go func(user string) {
			defer wg.Done()
			reply, err := client.Classify(context.Background(), &visionv1.ClassifyRequest{UserId: user, Image: []byte{0xff, 0xd8, 0xff}})
			if err == nil && reply.GetLabels()[0].GetLabel() != "topic-of-"+user {
				err = fmt.Errorf("%s got %v", user, reply.GetLabels())
			}
			errs <- err
		}(users[i])
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	return users
}
