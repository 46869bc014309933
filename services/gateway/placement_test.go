package main

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc"

	visionv1 "github.com/snaplearn/snaplearn/protos/go/gen/snaplearn/vision/v1"
)

// learnProcesses makes calls one at a time until the gateway knows which process each of its
// connections reaches (every connection opened a stream and read its header): `want` groups.
func learnProcesses(t *testing.T, p *proxy, client visionv1.VisionServiceClient, want int) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if groups := *p.groups.Load(); len(groups) == want && len(groups[0].members) > 1 {
			return
		}
		if _, err := client.Classify(context.Background(), &visionv1.ClassifyRequest{UserId: fmt.Sprintf("learn-%d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	t.Fatalf("still %d connection groups, want %d", len(*p.groups.Load()), want)
}

// streamsOf returns the distinct streams that carried the items of these users.
func streamsOf(b *heldBackend, users []string) map[int64]bool {
	streams := map[int64]bool{}
	for _, user := range users {
		if n, ok := b.streamOf.Load(user); ok {
			streams[n.(int64)] = true
		}
	}
	return streams
}

func TestAProcessReachedOnSeveralConnectionsGetsItsItemsOnOneStream(t *testing.T) {
	backend, _, _, addr := heldServer(t, "worker-a")
	p, conn := gateway(t, "--backend", addr, "--backend-connections", "4", "--max-in-flight", "256")
	client := visionv1.NewVisionServiceClient(conn)
	learnProcesses(t, p, client, 1)
	if members := len((*p.groups.Load())[0].members); members != 4 {
		t.Fatalf("the group has %d connections, want all 4", members)
	}
	users := classifyAtOnce(t, client, "burst", 40)
	if streams := streamsOf(backend, users); len(streams) != 1 {
		t.Fatalf("40 concurrent calls to one process came on %d streams, want 1", len(streams))
	}
}

// holdOneAtATime makes n held calls, each once the last has reached a backend, and returns
// how many reached each backend, and the users.
func holdOneAtATime(t *testing.T, client visionv1.VisionServiceClient, n int, backends ...*heldBackend) ([]int, []string, chan error) {
	t.Helper()
	counts := make([]int, len(backends))
	results := make(chan error, n)
	var users []string
	for i := range n {
		user := fmt.Sprintf("held-%d", i)
		users = append(users, user)
		go func() {
			_, err := client.Classify(context.Background(), &visionv1.ClassifyRequest{UserId: user})
			results <- err
		}()
		entered, deadline := false, time.Now().Add(10*time.Second)
		for !entered {
			if time.Now().After(deadline) {
				t.Fatalf("held call %d reached no backend", i)
			}
			for j, b := range backends {
				select {
				case <-b.entered:
					counts[j]++
					entered = true
				case <-time.After(time.Millisecond):
				}
			}
		}
	}
	return counts, users, results
}

func TestItemsGoToTheProcessWithTheFewestCallsOneStreamEach(t *testing.T) {
	a, _, _, addrA := heldServer(t, "worker-a")
	b, _, _, addrB := heldServer(t, "worker-b")
	p, conn := gateway(t, "--backend", addrA+","+addrB, "--backend-connections", "3", "--max-in-flight", "256")
	client := visionv1.NewVisionServiceClient(conn)
	learnProcesses(t, p, client, 2)
	counts, users, results := holdOneAtATime(t, client, 8, a, b)
	if counts[0] != 4 || counts[1] != 4 {
		t.Fatalf("held calls per process: %v, want 4 and 4", counts)
	}
	if sa, sb := streamsOf(a, users), streamsOf(b, users); len(sa) != 1 || len(sb) != 1 {
		t.Fatalf("process a's items came on %d streams, b's on %d; want one each", len(sa), len(sb))
	}
	close(a.release)
	close(b.release)
	for range users {
		if err := <-results; err != nil {
			t.Fatal(err)
		}
	}
}

func TestConnectionsToAServerThatDoesNotNameItselfEachCarryTheirOwnStream(t *testing.T) {
	backend, _, _, addr := heldServer(t, "")
	p, conn := gateway(t, "--backend", addr, "--backend-connections", "2", "--max-in-flight", "256")
	connectionsEachCarryTheirOwnStream(t, p, conn, backend)
}

func TestWithoutGroupingEachConnectionCarriesItsOwnStream(t *testing.T) {
	backend, _, _, addr := heldServer(t, "worker-a")
	p, conn := gateway(t, "--backend", addr, "--backend-connections", "2", "--max-in-flight", "256", "--group-by-process=false")
	connectionsEachCarryTheirOwnStream(t, p, conn, backend)
}

func connectionsEachCarryTheirOwnStream(t *testing.T, p *proxy, conn *grpc.ClientConn, backend *heldBackend) {
	t.Helper()
	client := visionv1.NewVisionServiceClient(conn)
	counts, users, results := holdOneAtATime(t, client, 4, backend)
	if counts[0] != 4 || len(*p.groups.Load()) != 2 {
		t.Fatalf("held %v, %d groups", counts, len(*p.groups.Load()))
	}
	if streams := streamsOf(backend, users); len(streams) != 2 {
		t.Fatalf("4 held calls over 2 connections came on %d streams, want 2 (least loaded each time)", len(streams))
	}
	close(backend.release)
	for range users {
		if err := <-results; err != nil {
			t.Fatal(err)
		}
	}
}
