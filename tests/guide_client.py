# ruff: noqa
# mypy: ignore-errors
# fmt: off
# The guide's "Python Client Example (Receive Only)" (spec/websocket-integration-guide.md), copied verbatim
# below this header and imported by tests/test_guide.py. The guide's code is the contract under test, so it
# is kept exactly as a user would paste it: lint, format and type checks are switched off for this file only.

import asyncio
import websockets
import json
from typing import Dict, Callable, Any

class DiaryWebSocketClient:
    def __init__(self, user_id: str, base_url: str = "ws://localhost:8000"):
        self.user_id = user_id
        self.base_url = base_url
        self.websocket = None
        self.message_handlers: Dict[str, Callable] = {}
    
    async def connect(self):
        """Connect to WebSocket"""
        uri = f"{self.base_url}/api/v1/ws/{self.user_id}"
        self.websocket = await websockets.connect(uri)
        print(f"Connected to WebSocket for user {self.user_id} (receive-only mode)")
    
    async def disconnect(self):
        """Disconnect from WebSocket"""
        if self.websocket:
            await self.websocket.close()
            self.websocket = None
    
    def on_message(self, message_type: str, handler: Callable):
        """Register message handler"""
        self.message_handlers[message_type] = handler
    
    async def listen(self):
        """Listen for incoming messages"""
        if not self.websocket:
            raise Exception("WebSocket not connected")
        
        async for message in self.websocket:
            data = json.loads(message)
            message_type = data.get("type", "unknown")
            
            if message_type in self.message_handlers:
                self.message_handlers[message_type](data)
            else:
                print(f"Received message: {data}")
    
    async def run(self, duration: int = 30):
        """Run the client for a specified duration"""
        try:
            await self.connect()
            
            # Listen for messages
            await asyncio.wait_for(self.listen(), timeout=duration)
            
        except asyncio.TimeoutError:
            print("Connection timeout")
        except Exception as e:
            print(f"Error: {e}")
        finally:
            await self.disconnect()

# Usage Example
async def main():
    client = DiaryWebSocketClient("123456789")
    
    # Set up message handlers
    def on_notification(message):
        print(f"Notification: {message['message']}")
    

    
    client.on_message("notification", on_notification)

    
    # Run client for 30 seconds
    await client.run(30)

# Run the example
if __name__ == "__main__":
    asyncio.run(main())
